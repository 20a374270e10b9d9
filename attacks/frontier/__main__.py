from attacks.frontier.cli import main

raise SystemExit(main())
