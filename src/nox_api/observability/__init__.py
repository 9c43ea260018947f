"""What the server tells its operators: the JSON-lines server log and its live stream."""
