/*
 * ormbridge.js: a dependency-free client for ormbridge's change events (Server-Sent Events).
 *
 *   var subscription = ormbridge.subscribe(["shop.product"], {
 *     onEvent: function (event) { ... event.type, event.model, event.pks, event.fields ... },
 *     onDenied: function (namespaces) { ... },   // namespaces this user may not see
 *     onClosed: function (reason) { ... },       // "logged-out" or "denied": it stopped
 *   });
 *   subscription.close();
 *
 * Events carry primary keys and field names, not values: refetch the rows through your
 * own (permission-checked) API. event.type is "create", "update", "delete", "invalidate"
 * (event.pks null: every row) or "removed": the rows left this namespace (a tenant's, say);
 * drop them from what you show for it. The browser reconnects by itself, sending Last-Event-ID;
 * when it gives up (a server restart answering with an error), this client reconnects
 * after `retryMs`, resuming from the last event it saw, so nothing is missed or repeated
 * within the server's retention.
 *
 * The server ends a stream with a `closed` event: at the stream's maximum age (the browser
 * reconnects and resumes), when the user may no longer see some of its namespaces
 * (onDenied; the others go on after the reconnection), or when the user is logged out or
 * may see none of them any more: then this client stops and calls onClosed.
 */
(function (root) {
  "use strict";

  function subscribe(namespaces, options) {
    options = options || {};
    var url = options.url || "/ormbridge/events/";
    var onEvent = options.onEvent || function () {};
    var onDenied = options.onDenied || function () {};
    var onOpen = options.onOpen || function () {};
    var onClosed = options.onClosed || function () {};
    var retryMs = options.retryMs || 2000;
    var lastEventId = options.lastEventId || null;
    var source = null;
    var timer = null;
    var closed = false;
    var denied = {};

    function deny(names) {
      names.forEach(function (namespace) {
        denied[namespace] = true;
      });
      onDenied(names);
    }

    function stop() {
      closed = true;
      clearTimeout(timer);
      if (source) {
        source.close();
      }
    }

    function address() {
      var params = namespaces.map(function (namespace) {
        return "ns=" + encodeURIComponent(namespace);
      });
      if (lastEventId) {
        params.push("last_event_id=" + encodeURIComponent(lastEventId));
      }
      return url + "?" + params.join("&");
    }

    function open() {
      source = new EventSource(address(), { withCredentials: true });
      source.onopen = function () {
        onOpen();
      };
      source.onmessage = function (message) {
        if (message.lastEventId) {
          lastEventId = message.lastEventId;
        }
        onEvent(JSON.parse(message.data));
      };
      source.addEventListener("denied", function (message) {
        deny(JSON.parse(message.data));
      });
      source.addEventListener("closed", function (message) {
        var why = JSON.parse(message.data);
        if (message.lastEventId) {
          lastEventId = message.lastEventId;
        }
        if (why.reason === "denied") {
          deny(why.namespaces);
        }
        var left = namespaces.filter(function (namespace) {
          return !denied[namespace];
        });
        if (why.reason === "logged-out" || left.length === 0) {
          stop();
          onClosed(why.reason);
        }
      });
      source.onerror = function () {
        if (!closed && source.readyState === EventSource.CLOSED) {
          source = null;
          timer = setTimeout(open, retryMs);
        }
      };
    }

    open();
    return {
      close: stop,
      lastEventId: function () {
        return lastEventId;
      },
    };
  }

  root.ormbridge = { subscribe: subscribe };
})(window);
