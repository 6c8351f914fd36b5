from napari_cytodiffusion.cli import main

raise SystemExit(main())
