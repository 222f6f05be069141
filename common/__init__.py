"""Small helpers every layer may use (agent, drivers, engines); this package imports none of them."""
