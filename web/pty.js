/*
 * The flynnsched terminal page: xterm.js connected to a PTY session over a WebSocket.
 *
 * Terminal bytes travel as binary frames both ways and are never decoded here (xterm.js decodes
 * UTF-8 itself, across frame boundaries); control messages are JSON text frames. The page counts
 * the output bytes it has shown, so after a dropped connection it reattaches to the same session
 * (with a fresh token, using the session's secret kept in sessionStorage: a reload of this tab
 * comes back to its session) and gets exactly what it missed.
 */
(function () {
  "use strict";

  var root = document.getElementById("pty");
  var config = JSON.parse(root.dataset.config);
  var statusEl = document.getElementById("status");
  var stateEl = document.getElementById("state");
  var jobEl = document.getElementById("job-id");
  var sizeEl = document.getElementById("size");
  var retryEl = document.getElementById("retry");

  var STORAGE_KEY = "flynnsched.pty:" + location.pathname + location.search;
  var HIGH_WATER = 256 * 1024;  // bytes handed to xterm.js but not yet parsed: pause the program
  var LOW_WATER = 32 * 1024;    // ... and let it go on below this
  var INPUT_CHUNK = 32 * 1024;  // pasted text goes out in pieces of at most this
  var HEARTBEAT = 10000;        // ms between pings; a connection silent for two of them is dead

  var term = new Terminal({
    cursorBlink: true,
    scrollback: 5000,
    fontFamily: '"DejaVu Sans Mono", "Noto Sans Mono CJK SC", "WenQuanYi Micro Hei Mono", "WenQuanYi Zen Hei Mono", monospace',
    fontSize: 14,
    theme: { background: "#1e1e1e", foreground: "#d4d4d4" }
  });
  var fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  term.focus();

  var encoder = new TextEncoder();
  var saved = readSaved();
  var firstToken = config.token;  // minted with this page; good for one start
  var ws = null;
  var offset = 0;                 // output bytes shown so far
  var ended = false;
  var attempts = 0;
  var connections = 0;            // WebSockets opened by this page so far
  var reconnectTimer = null;
  var heartbeatTimer = null;
  var lastHeard = 0;
  var pending = 0;
  var replayFrames = 0;           // frames of history whose queries were answered before
  var quiet = 0;                  // writes in progress whose replies to the program are dropped
  var pauseSent = false;

  function readSaved() {
    try {
      var value = JSON.parse(sessionStorage.getItem(STORAGE_KEY) || "null");
      return value && typeof value.id === "string" && typeof value.secret === "string" ? value : null;
    } catch (e) {
      return null;
    }
  }

  function forget() {
    saved = null;
    try { sessionStorage.removeItem(STORAGE_KEY); } catch (e) { /* storage disabled */ }
  }

  function setState(state, detail) {
    statusEl.dataset.state = state;
    stateEl.textContent = detail ? state + " " + detail : state;
    retryEl.hidden = !(state === "disconnected" || state === "taken over");
  }

  function showSize() {
    sizeEl.textContent = term.cols + "×" + term.rows;
    statusEl.dataset.cols = term.cols;
    statusEl.dataset.rows = term.rows;
  }

  function send(data) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(data);
      return true;
    }
    return false;
  }

  function control(message) {
    return send(JSON.stringify(message));
  }

  function sendInput(bytes) {
    for (var i = 0; i < bytes.length; i += INPUT_CHUNK) {
      send(bytes.subarray(i, i + INPUT_CHUNK));
    }
  }

  function write(bytes, replayed) {
    pending += bytes.length;
    if (replayed) {
      quiet += 1;
    }
    term.write(bytes, function () {
      if (replayed) {
        quiet -= 1;
      }
      pending -= bytes.length;
      if (pauseSent && pending < LOW_WATER) {
        pauseSent = false;
        control({ type: "resume" });
      }
    });
    if (!pauseSent && pending > HIGH_WATER) {
      pauseSent = true;
      control({ type: "pause" });
    }
  }

  function onStatus(message) {
    if (message.job_id) {
      jobEl.textContent = message.job_id;
      statusEl.dataset.jobId = message.job_id;
    }
    if (message.container_id) {
      statusEl.dataset.containerId = message.container_id;
    }
    if (message.state === "exited" || message.state === "failed") {
      ended = true;
      forget();
      var code = message.exit_code;
      if (code !== undefined && code !== null) {
        statusEl.dataset.exitCode = String(code);
      }
      var detail = code !== undefined && code !== null ? String(code) : "";
      if (message.reason) {
        detail += (detail ? " — " : "— ") + message.reason;
      }
      setState(message.state, detail);
      term.write("\r\n\x1b[2m[" + (message.state === "exited" ? "exited with code " + code : "failed") +
        (message.reason ? ": " + message.reason : "") + "]\x1b[0m\r\n");
      return;
    }
    setState(message.state);
  }

  function onControl(message) {
    switch (message.type) {
      case "session":
        saved = { id: message.id, secret: message.secret };
        try { sessionStorage.setItem(STORAGE_KEY, JSON.stringify(saved)); } catch (e) { /* storage disabled */ }
        break;
      case "status":
        onStatus(message);
        break;
      case "replay":
        replayFrames += 1;
        break;
      case "reset":
        term.reset();
        offset = message.offset;
        break;
      default:
        break;
    }
  }

  async function nextToken() {
    if (saved) {
      try {
        var response = await fetch(config.sessions + "/" + encodeURIComponent(saved.id) + "/token", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ secret: saved.secret }),
          credentials: "same-origin",
          cache: "no-store"
        });
        if (response.ok) {
          return (await response.json()).token;
        }
        if (response.status === 404) {
          forget();  // that session is over; a fresh page may start another
        } else {
          throw new Error("HTTP " + response.status);
        }
      } catch (e) {
        if (saved) {
          throw e;  // the daemon is unreachable: try again later
        }
      }
    }
    if (firstToken) {
      var token = firstToken;
      firstToken = null;
      return token;
    }
    return null;
  }

  async function connect() {
    reconnectTimer = null;
    setState(attempts === 0 && !saved ? "connecting" : "reconnecting");
    var token;
    try {
      token = await nextToken();
    } catch (e) {
      scheduleReconnect();
      return;
    }
    if (!token) {
      ended = true;
      setState("ended", "— the session is over; reload to start a new one");
      return;
    }
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + location.host + config.ws, [config.subprotocol, config.tokenPrefix + token]);
    socket.binaryType = "arraybuffer";
    ws = socket;
    pending = 0;
    replayFrames = 0;
    pauseSent = false;
    socket.onopen = function () {
      attempts = 0;
      connections += 1;
      statusEl.dataset.connections = String(connections);
      lastHeard = Date.now();
      control({ type: "hello", offset: offset, cols: term.cols, rows: term.rows });
      startHeartbeat();
    };
    socket.onmessage = function (event) {
      if (socket !== ws) {
        return;
      }
      lastHeard = Date.now();
      if (typeof event.data === "string") {
        onControl(JSON.parse(event.data));
      } else {
        var bytes = new Uint8Array(event.data);
        offset += bytes.length;
        var replayed = replayFrames > 0;
        if (replayed) {
          replayFrames -= 1;
        }
        write(bytes, replayed);
      }
    };
    socket.onclose = function (event) {
      if (socket !== ws) {
        return;
      }
      ws = null;
      stopHeartbeat();
      if (ended) {
        return;
      }
      if (event.code === 4000) {
        setState("taken over", "— this session was opened in another window");
      } else if (event.code === 4404) {
        forget();
        ended = true;
        setState("ended", "— the session is over; reload to start a new one");
      } else {
        setState("disconnected");
        scheduleReconnect();
      }
    };
  }

  function scheduleReconnect() {
    if (ended || reconnectTimer !== null) {
      return;
    }
    var delay = Math.min(10000, 250 * Math.pow(2, attempts));
    attempts += 1;
    setState("disconnected", "— reconnecting in " + Math.round(delay / 1000) + " s");
    reconnectTimer = setTimeout(connect, delay);
  }

  function startHeartbeat() {
    stopHeartbeat();
    heartbeatTimer = setInterval(function () {
      if (Date.now() - lastHeard > 2 * HEARTBEAT) {
        // Nothing heard for too long: the connection is dead even if the browser doesn't know.
        var socket = ws;
        ws = null;
        stopHeartbeat();
        if (socket) {
          socket.close();
        }
        setState("disconnected");
        scheduleReconnect();
        return;
      }
      control({ type: "ping" });
    }, HEARTBEAT);
  }

  function stopHeartbeat() {
    if (heartbeatTimer !== null) {
      clearInterval(heartbeatTimer);
      heartbeatTimer = null;
    }
  }

  term.onData(function (data) {
    if (quiet > 0) {
      return;  // xterm.js answering a query in replayed history: the program had its answer
    }
    sendInput(encoder.encode(data));
  });
  term.onBinary(function (data) {
    if (quiet > 0) {
      return;
    }
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) {
      bytes[i] = data.charCodeAt(i) & 0xff;
    }
    sendInput(bytes);
  });
  term.onResize(function (size) {
    showSize();
    control({ type: "resize", cols: size.cols, rows: size.rows });
  });

  var fitFrame = null;
  function refit() {
    if (fitFrame === null) {
      fitFrame = requestAnimationFrame(function () {
        fitFrame = null;
        fit.fit();
      });
    }
  }
  window.addEventListener("resize", refit);
  if (window.ResizeObserver) {
    new ResizeObserver(refit).observe(document.getElementById("terminal"));
  }
  retryEl.addEventListener("click", function () {
    if (reconnectTimer !== null) {
      clearTimeout(reconnectTimer);
    }
    attempts = 0;
    connect();
    term.focus();
  });

  showSize();
  connect();
})();
