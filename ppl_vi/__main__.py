import sys

from ppl_vi.cli import main

sys.exit(main())
