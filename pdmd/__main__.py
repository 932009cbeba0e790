from pdmd.cli import main

raise SystemExit(main())
