// Lumen dashboard: clicking (or pressing Enter or Space on) a graph node or edge shows its
// figures in the detail panel; Escape closes it and returns focus to what opened it. Every
// other state lives in the page's URL. No framework, no other file.
(function () {
  'use strict';
  var panel = document.getElementById('detail');
  if (!panel) { return; }
  var names = {
    service: 'service', version: 'version', source: 'from', target: 'to', health: 'health',
    requests: 'requests', rps: 'requests/s', errors: 'errors %', p50: 'p50 ms', p95: 'p95 ms',
    p99: 'p99 ms', reqBytes: 'request body', respBytes: 'response body'
  };
  var opener = null;
  function hide() {
    panel.hidden = true;
    document.querySelectorAll('.selected').forEach(function (s) { s.classList.remove('selected'); });
    if (opener) { opener.focus(); opener = null; }
  }
  function show(el) {
    opener = el;
    var d = el.dataset;
    var rows = [];
    Object.keys(names).forEach(function (k) {
      if (d[k] !== undefined && d[k] !== '') {
        rows.push('<dt>' + names[k] + '</dt><dd></dd>');
      }
    });
    panel.innerHTML = '<h2>' + (d.source ? 'Calls' : 'Node') + '</h2><dl>' + rows.join('') + '</dl>';
    var dds = panel.querySelectorAll('dd');
    var i = 0;
    Object.keys(names).forEach(function (k) {
      if (d[k] !== undefined && d[k] !== '') { dds[i].textContent = d[k]; i += 1; }
    });
    // The service's own page, with this page's range and thresholds.
    var service = d.service || (d.source || '').split('@')[0];
    if (service) {
      var link = document.createElement('a');
      link.href = '/service/' + encodeURIComponent(service) + window.location.search;
      link.textContent = 'open ' + service;
      link.id = 'open-service';
      var p = document.createElement('p');
      p.appendChild(link);
      panel.appendChild(p);
    }
    document.querySelectorAll('.selected').forEach(function (s) { s.classList.remove('selected'); });
    el.classList.add('selected');
    panel.hidden = false;
  }
  document.addEventListener('keydown', function (e) {
    if (e.key === 'Escape' && !panel.hidden) { e.preventDefault(); hide(); }
  });
  document.querySelectorAll('svg .node, svg .edge').forEach(function (el) {
    el.addEventListener('click', function () { show(el); });
    el.addEventListener('keydown', function (e) {
      if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); show(el); }
    });
  });
})();
