from nox_api.cli import main

main()
