"""`zeroconv demo`: the shipped world base and its ControlNet, generating with and without control (offline, CPU)."""
