import sys

from cqd_mpi.cli import main

sys.exit(main())
