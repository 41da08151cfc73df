/*
 * ormbridge.js: a dependency-free client for ormbridge's change events (Server-Sent Events).
 *
 *   var subscription = ormbridge.subscribe(["shop.product"], {
 *     onEvent: function (event) { ... event.type, event.model, event.pks, event.fields ... },
 *     onDenied: function (namespaces) { ... },   // namespaces this user may not see
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
 */
(function (root) {
  "use strict";

  function subscribe(namespaces, options) {
    options = options || {};
    var url = options.url || "/ormbridge/events/";
    var onEvent = options.onEvent || function () {};
    var onDenied = options.onDenied || function () {};
    var onOpen = options.onOpen || function () {};
    var retryMs = options.retryMs || 2000;
    var lastEventId = options.lastEventId || null;
    var source = null;
    var timer = null;
    var closed = false;

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
        onDenied(JSON.parse(message.data));
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
      close: function () {
        closed = true;
        clearTimeout(timer);
        if (source) {
          source.close();
        }
      },
      lastEventId: function () {
        return lastEventId;
      },
    };
  }

  root.ormbridge = { subscribe: subscribe };
})(window);
