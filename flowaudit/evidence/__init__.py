"""What the verdicts rest on: Remark 2 per site, the condition search, the attack and the certificate."""
