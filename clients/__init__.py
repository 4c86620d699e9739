"""What Enterprise Servers, WorkStations and tools embed to get their licenses."""
