"""Services: the use cases, each a function over a Runtime (database, clock, gateway, vault)."""
