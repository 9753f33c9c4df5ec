"""xDS: pure resource builders, the snapshot and its cache, and the gRPC ADS transport."""
