"""claude-peers' bench and the harness it shares with the tests: in a checkout, never installed."""
