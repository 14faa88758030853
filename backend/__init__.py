"""The Label Studio ML backend (thin: parse, enqueue, wait, format). Not built yet."""
