"""The License Server's rules: trusted storage and leasing; never imports grpc."""
