"""Security of the two HTTP APIs: API keys hashed at rest, auth and address policy, Host/Origin checks, rate limits.

The modules here are pure (no aiohttp); `agent.api` middleware applies them to requests.
"""
