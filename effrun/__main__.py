from effrun.cli import main

main()
