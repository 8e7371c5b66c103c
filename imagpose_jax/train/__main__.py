import sys

from imagpose_jax.train.main import main

sys.exit(main())
