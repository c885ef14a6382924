import sys

from channelscope.cli import main

sys.exit(main())
