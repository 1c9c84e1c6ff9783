from .run import main, show_fastgemma_log

show_fastgemma_log()
main()
