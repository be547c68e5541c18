"""Write the synthetic demo Datanets into data/datanets (deterministic for a seed)."""

import sys

from longtail.attribution.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
