"""The coordinator of a volunteer network: its scheduler, role gate, relay, credit and virtual labs."""
