from kdrun.cli.main import main

main()
