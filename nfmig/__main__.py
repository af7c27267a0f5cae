from nfmig.cli import main

raise SystemExit(main())
