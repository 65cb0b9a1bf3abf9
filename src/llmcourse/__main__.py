from llmcourse.cli import main

raise SystemExit(main())
