"""The billing flow's HTML pages: self-contained (no external assets), every dynamic value escaped."""
from __future__ import annotations

import base64
import hashlib
from html import escape

_STYLE = """
:root{color-scheme:light dark;font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif}
body{margin:0;min-height:100vh;display:grid;place-items:center;background:#f5f5f7;color:#1d1d1f}
main{max-width:28rem;width:calc(100% - 2rem);background:#fff;border-radius:12px;padding:2rem;
box-shadow:0 2px 12px rgba(0,0,0,.08)}
h1{font-size:1.4rem;margin:0 0 .5rem}p{line-height:1.5}
label{display:block;font-weight:600;margin:1rem 0 .3rem}
input[type=email]{width:100%;box-sizing:border-box;padding:.6rem;font-size:1rem;border:1px solid #ccc;
  border-radius:8px}
button{margin-top:1rem;padding:.6rem 1.2rem;font-size:1rem;border:0;border-radius:8px;
  background:#1d4ed8;color:#fff;cursor:pointer}
button[disabled]{opacity:.6;cursor:default}
code{display:block;word-break:break-all;padding:.8rem;background:#f0f0f3;border-radius:8px;font-size:.95rem}
.error{color:#b91c1c}.muted{color:#6b7280;font-size:.9rem}
@media (prefers-color-scheme:dark){body{background:#111;color:#eee}main{background:#1c1c1e}
  code{background:#2c2c2e}}
""".strip()

_SIGNUP_SCRIPT = """
(function(){
  var form=document.getElementById('signup'),btn=document.getElementById('submit');
  var err=document.getElementById('error');
  form.addEventListener('submit',function(ev){
    ev.preventDefault();err.textContent='';btn.disabled=true;
    fetch('/v1/checkout',{method:'POST',
      headers:{'Content-Type':'application/json','Accept':'application/json'},
      body:JSON.stringify({email:document.getElementById('email').value})})
    .then(function(r){return r.json().then(function(b){return {ok:r.ok,body:b};});})
    .then(function(res){
      var url=res.body&&res.body.url;
      if(res.ok&&typeof url==='string'&&/^https?:\\/\\//.test(url)){window.location.assign(url);return;}
      err.textContent='Could not start checkout. Please check the address and try again.';
      btn.disabled=false;
    })
    .catch(function(){err.textContent='Network error. Please try again.';btn.disabled=false;});
  });
})();
""".strip()

_SUCCESS_SCRIPT = """
(function(){
  var root=document.getElementById('checkout'),token=root.getAttribute('data-token');
  var state=document.getElementById('state'),box=document.getElementById('key-box');
  var key=document.getElementById('api-key');
  var copy=document.getElementById('copy'),tries=0;
  function show(k){key.textContent=k;box.hidden=false;
    state.textContent='Your API key is ready. It is shown only once: copy it now.';}
  function poll(){
    tries++;
    fetch('/v1/checkout/success?token='+encodeURIComponent(token),
      {headers:{'Accept':'application/json'},cache:'no-store'})
    .then(function(r){if(!r.ok)throw new Error(String(r.status));return r.json();})
    .then(function(b){
      if(b.ready&&typeof b.api_key==='string'){show(b.api_key);return;}
      if(b.ready&&b.expired){
        state.textContent='This API key expired before it was collected. Contact support.';return;
      }
      if(b.ready){
        state.textContent='This API key was already shown. If you did not save it, contact support.';return;
      }
      if(tries<120){setTimeout(poll,1000);return;}
      state.textContent='Still waiting for payment confirmation. Reload this page in a minute.';
    })
    .catch(function(){state.className='error';
      state.textContent='Could not check the payment status. Reload this page.';});
  }
  copy.addEventListener('click',function(){
    var done=function(){copy.textContent='Copied';};
    if(navigator.clipboard&&navigator.clipboard.writeText){
      navigator.clipboard.writeText(key.textContent).then(done,function(){});return;
    }
    var r=document.createRange();r.selectNodeContents(key);var s=window.getSelection();
    s.removeAllRanges();s.addRange(r);
    try{document.execCommand('copy');done();}catch(e){}
  });
  poll();
})();
""".strip()


def _sha256(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def security_headers() -> dict[str, str]:
    """Headers to send with these pages: a CSP that admits only their own inline script and style."""
    scripts = " ".join(_sha256(s) for s in (_SIGNUP_SCRIPT, _SUCCESS_SCRIPT))
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {scripts}; style-src {_sha256(_STYLE)}; "
            "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }


def _page(title: str, body: str, script: str | None = None) -> str:
    script_tag = f"<script>{script}</script>" if script else ""
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main>{script_tag}</body></html>"
    )


def signup_page() -> str:
    """The signup form; it posts the email to /v1/checkout and follows the returned URL."""
    body = (
        "<h1>Subscribe to Timbre</h1>"
        "<p>Clone a voice once and synthesize speech with it over a simple API.</p>"
        "<form id=\"signup\" method=\"post\" action=\"/v1/checkout\" novalidate>"
        "<label for=\"email\">Email</label>"
        "<input id=\"email\" name=\"email\" type=\"email\" autocomplete=\"email\" required maxlength=\"254\">"
        "<button id=\"submit\" type=\"submit\">Continue to payment</button>"
        "<p id=\"error\" class=\"error\" role=\"alert\"></p>"
        "</form><p class=\"muted\">Payment is handled by Stripe. This creates a new account; to renew an existing "
        "one, start the checkout with its API key (<code>POST /v1/checkout</code> with "
        "<code>Authorization: Bearer</code>).</p>"
    )
    return _page("Subscribe · Timbre", body, _SIGNUP_SCRIPT)


def success_page(token: str) -> str:
    """Waits for the payment to be confirmed, then shows the API key once with a copy button."""
    body = (
        f"<section id=\"checkout\" data-token=\"{escape(token, quote=True)}\">"
        "<h1>Thank you!</h1>"
        "<p id=\"state\" role=\"status\" aria-live=\"polite\">Confirming your payment…</p>"
        "<div id=\"key-box\" hidden><code id=\"api-key\"></code>"
        "<button id=\"copy\" type=\"button\">Copy</button></div>"
        "</section>"
    )
    return _page("Your API key · Timbre", body, _SUCCESS_SCRIPT)


def already_subscribed_page() -> str:
    """Shown instead of a second checkout to an account (its own key) whose subscription is still active."""
    body = (
        "<h1>You are already subscribed</h1>"
        "<p>This account already has an active Timbre subscription, so no new payment was started.</p>"
        "<p class=\"muted\">Lost your API key? Contact support from the address you subscribed with.</p>"
    )
    return _page("Already subscribed · Timbre", body)
