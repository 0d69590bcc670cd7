import sys

from multitask.data.check import main

sys.exit(main())
