from milters.main import main

main()
