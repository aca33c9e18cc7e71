from adapterkit.cli import main

main()
