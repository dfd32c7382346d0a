import sys

from caster.cli import main

sys.exit(main())
