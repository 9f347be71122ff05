from policyd.main import main

main()
