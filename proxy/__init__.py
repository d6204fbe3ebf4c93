"""sobot-proxy: an authenticating reverse proxy for the Sobot Open APIs (v5 and the V6 call centre).

Applications send their Sobot calls to the proxy; it injects one managed token, renews it
before it expires, and replays a call once when Sobot answers that the token expired.
"""

__version__ = "0.1.0"
