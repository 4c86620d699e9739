"""The License Server: trusted storage and network seat leasing."""
