"""The edge of the product: the `rlhf` command, launching the Prefect flows, the warm stage
server and the servers around them. Only this package (and flows/, tasks/) knows Prefect and
loads a flow; nothing below it imports it."""
