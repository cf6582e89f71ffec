from pubmon.cli import main

raise SystemExit(main())
