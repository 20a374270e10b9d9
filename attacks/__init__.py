"""Wrong-key and key-estimation attacks on protected models (issue: attacks and evaluation)."""
