"""Pre-training data: a synthetic NCT-CRC-HE-100K stand-in and the dataset that reads both."""
