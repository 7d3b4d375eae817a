from rlfuse.cli import main

main()
