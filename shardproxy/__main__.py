from shardproxy.cli import main

main()
