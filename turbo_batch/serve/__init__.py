"""`turbo-batch serve`: an OpenAI-compatible Ray Serve app on the batch engine class.

spec.py     the serve file (ServeSpec)
app.py      building, deploying and removing the app; the `serve` command
replica.py  the Engine deployment: one engine per replica, the online-first gate
ingress.py  the FastAPI ingress: routes, rendering, SSE
http.py     errors, request schemas, the auth/limits guard, metrics
"""
