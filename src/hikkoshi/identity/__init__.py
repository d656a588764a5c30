"""Who a host is: the cluster's certificate authority, one certificate per host, and the TLS settings
every inter-host stream is made with (the agents' API, QEMU's migration stream, NBD).

The cluster CA is kept by the user (``hikkoshi cluster init``); it signs one certificate per host
(``hikkoshi cluster issue``), valid as a TLS server and as a client, naming the host (its common name
and a DNS name) and its addresses. A peer is known by the host name in its certificate, never by an
address or a URL a request names.
"""
