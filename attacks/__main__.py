import sys

from attacks.audit import main

sys.exit(main())
