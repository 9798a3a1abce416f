import sys

from flowdppo_video.commands.cli import main

sys.exit(main())
