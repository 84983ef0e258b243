"""The web console: what every run did, served by the server itself at /console.

Server-rendered Jinja2 pages over the services layer (like the API routers),
one small script of ours for live run views, every asset served from here:
it works offline. Signed in with an API key (kept in an HttpOnly cookie);
with no keys configured the console is open, like the API.
"""
