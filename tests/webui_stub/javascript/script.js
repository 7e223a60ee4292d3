// Stand-in for the WebUI v1.10.1's script.js (written for the tests, not copied): the page functions that
// extensions' scripts call. gradioApp() is the element holding the page; onUiLoaded(callback) runs the callback
// once, when the page's UI has been drawn (v1.10.1 waits for #txt2img_prompt, which the stand-in page lacks: it
// waits for the top-level tabs, drawn in the same update); onUiUpdate(callback) runs it at every DOM change.

function gradioApp() {
    var elems = document.getElementsByTagName('gradio-app');
    var elem = elems.length ? elems[0] : document;
    if (elem !== document) {
        elem.getElementById = function(id) {
            return document.getElementById(id);
        };
    }
    return elem.shadowRoot ? elem.shadowRoot : elem;
}

var uiLoadedCallbacks = [];
var uiUpdateCallbacks = [];
var executedOnLoaded = false;

function onUiLoaded(callback) {
    uiLoadedCallbacks.push(callback);
}

function onUiUpdate(callback) {
    uiUpdateCallbacks.push(callback);
}

function executeCallbacks(queue, arg) {
    queue.forEach(function(callback) {
        try {
            callback(arg);
        } catch (e) {
            console.error('error running callback', callback, ':', e);
        }
    });
}

document.addEventListener('DOMContentLoaded', function() {
    new MutationObserver(function(mutations) {
        if (!executedOnLoaded && gradioApp().querySelector('#tabs')) {
            executedOnLoaded = true;
            executeCallbacks(uiLoadedCallbacks);
        }
        executeCallbacks(uiUpdateCallbacks, mutations);
    }).observe(gradioApp(), {childList: true, subtree: true});
});
