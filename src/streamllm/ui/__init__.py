"""The web chat: static files (index.html, app.js, markdown.js, style.css) served by the gateway."""
