"""The trainer and its evaluation (STS, retrieval, reports, export): a user of mmloss, never imported by it."""
