from dvla_tools.cli import main

raise SystemExit(main())
