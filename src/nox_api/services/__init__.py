"""Services: the operations of Nox, independent of HTTP. Routes call these."""
