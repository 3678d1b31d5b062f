from clbench.cli import main

raise SystemExit(main())
