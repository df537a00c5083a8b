from clickagg.cli.main import main

main()
